"""Benchmarks of diagode-dist: our gradient against its exact reference and its peers.

    python -m benchmarks [--quick] [--cases demo,n1024,stiff2d|none] [--repeat R]
                         [--peer-budget SECONDS] [--no-peers] [--scaling] [--service]
                         [--gpu] [--markdown]

Not part of the installed package: run it from a checkout of the repository (its root on the
path). For every case it times ``dd.loss_and_grad`` (median of R runs) and scores its gradient
against the exact dense reference. With torch + torchdiffeq installed (the ``bench`` extra) the
peers of ``peers.py`` run on the identical loss and gradient in the same process, float64,
2 threads; each row gives time, relative gradient error and the ratio peer time / our time.
``--scaling`` adds our time against n, S and k on sparse problems; ``--service`` the Dask
service's overhead per step and speed-up; ``--gpu`` the orthogonalisation's bytes, achieved
bandwidth and roofline fraction on CuPy.

Modules: ``cli`` (the command line), ``compare`` (the cases table), ``cases`` (the problems),
``peers`` (torch), ``scaling``, ``service``, ``roofline`` (GPU), ``gpu_probes`` (the GPU
acceptance probes, run by ``gpu_check.sh``), ``machine`` and ``table`` (the report's header
and tables).
"""
