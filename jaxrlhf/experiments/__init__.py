"""The study's experiments in miniature, as programs: ``python -m jaxrlhf.experiments.<name>``.

Each writes its table, plot and results.json (see docs/experiments_*.md); the training stages they
run are ordinary configs (the quickstart's stage configs, ``jaxrlhf.quickstart.stage_config``).
"""
