"""Parallel-efficiency tool: measure one config at several world sizes, project to many GPUs.

Measure (every run goes through the real entry point, launched by torchrun or horovodrun)::

    python -m secondorder.scaling measure --backend torch --world-sizes 1,2 --scaling weak \\
        --batch-per-rank 128 --steps 60 --threads 1 --out runs/scaling \\
        --name cpu-gloo-sgd-cnn1d -- model=cnn1d data=mnist1d optimizer=sgd
    python -m secondorder.scaling measure ... -- optimizer=kfac     # another optimizer: one arg

Project (compute time per step as a documented input, bytes counted by a tiny 2-rank run of the
same model and optimizer through the entry point)::

    python -m secondorder.scaling project --compute-s 0.0853 --count \\
        --out runs/scaling --name resnet50-sgd-8xh100 \\
        -- model=resnet50 data=synthetic data.shape=[3,32,32] data.num_classes=1000 optimizer=sgd

Report (rebuild ``<name>.md`` and ``<name>.png`` from a result's ``<name>.json`` alone)::

    python -m secondorder.scaling report runs/scaling/resnet50-sgd-8xh100.json

Modules: :mod:`~secondorder.scaling.measure` (runs, compute and communication per step),
:mod:`~secondorder.scaling.readers` (a run's ``metrics.jsonl`` and byte counts),
:mod:`~secondorder.scaling.project` and :mod:`~secondorder.scaling.cost_model` (the ring
all-reduce alpha-beta model, with its documented defaults: 8xH100 NVLink bus bandwidth within a
node, InfiniBand across nodes), :mod:`~secondorder.scaling.report` (tables and plots; plots need
the ``plots`` extra), :mod:`~secondorder.scaling.cli`. The committed results and what they show
are in ``benchmarks/results/scaling/`` (``python -m benchmarks.run scaling``).
"""
