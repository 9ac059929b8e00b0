"""``optimfx bench`` and the step benchmarks it shares with the pytest-benchmark suite in ``benches/``.

* :mod:`.presets`: parameter-shape presets and the parameters + gradients to time them on.
* :mod:`.registry`: what is timed (torch.optim.Adam/Adafactor baselines and every exported optimfx
  optimizer per backend, with their byte models) and what races (:data:`~.registry.RACE_RECIPES`).
* :mod:`.roofline`: the reference bandwidth measured in the same process.
* :mod:`.timing`: warm-up, timed steps, round-robin rounds.
* :mod:`.race`: the convergence race on scikit-learn's digits.
* :mod:`.report`: the tables and the JSON report; :mod:`.plot`: the PNG figure (matplotlib, lazily).
* :mod:`.progress`: progress bars (tqdm, when installed) and log lines.
* :mod:`.job`: the whole ``optimfx bench`` run, from a resolved :class:`~.job.Plan`.
"""
