"""Step benchmarks shared by ``optimfx bench`` and the pytest-benchmark suite in ``benches/``.

* :mod:`.presets`: parameter-shape presets and the parameters + gradients to time them on.
* :mod:`.registry`: the implementations under test (torch.optim.Adam baselines and every exported
  optimfx optimizer per backend) with their byte models.
* :mod:`.roofline`: the reference bandwidth measured in the same process.
* :mod:`.timing`: warm-up, timed steps, round-robin rounds.
* :mod:`.report`: the table and the JSON report.
"""
