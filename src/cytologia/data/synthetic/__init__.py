"""A synthetic Cytologia data set the project makes itself (the default data of demo, tests and benchmarks).

Modules: :mod:`.stats` (real aggregates), :mod:`.sources` (acquisition sources), :mod:`.morphology` (class ->
look), :mod:`.render` (one image), :mod:`.defects` (injected noise with its truth), :mod:`.generate` (a whole data
set: ``generate(out_dir, n_images, seed, config)``), :mod:`.preview` (contact sheets), :mod:`.cli`
(``cytologia synth``) and :mod:`.bench` (``cytologia bench synth``).
"""
