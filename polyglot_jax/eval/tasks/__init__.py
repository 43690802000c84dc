"""lm-evaluation-harness task files: KoBEST templates (`kobest_*_template_yaml`, the harness's own
kobest YAMLs without their dataset) and the functions they name (`utils.py`). The tasks to run are
written, pointing at local data, by `polyglot_jax.eval.harness.write_kobest_tasks`."""
