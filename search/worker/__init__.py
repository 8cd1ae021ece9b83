"""A worker: what every launcher runs. `run` opens the study and runs the worker's share;
`loop` keeps up to P trials in flight as one stacked model (ask, train an epoch, report, refill);
`sizing` decides P (`--pack auto`) and how many may be in flight while the study knows little
(`--ramp`)."""
