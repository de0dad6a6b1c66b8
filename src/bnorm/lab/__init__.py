"""``bnorm lab``: every claim of the article measured on real offline data.

- :mod:`bnorm.lab.data`: offline datasets (the article's circles, 5,000 real MNIST digits, MNIST-1D)
- :mod:`bnorm.lab.train`: the one training loop every experiment uses
- :mod:`bnorm.lab.experiment`: what an experiment is (claim, setup, run, summary, verdict rule)
- :mod:`bnorm.lab.experiments`: one file per experiment
- :mod:`bnorm.lab.runner`: runs experiments per seed, atomically, resumable
- :mod:`bnorm.lab.report`: the self-contained ``report.html``
"""
