"""What a run is asked to do, read and checked before anything exists: search spaces (`space`),
study files (`studyfile`), objectives and constraints, Optuna's samplers and pruners by name
(`algorithms`), the checks a value gets from any source (`values`), and the resolved run
(`settings.RunSettings`, the plain data every worker receives)."""
