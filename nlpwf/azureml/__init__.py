"""Azure ML jobs: nlpwf's side of the Azure ML launcher (launchers/hydra_plugins/nlpwf_azureml_launcher).

The launcher decides where a job runs, as Hydra's own remote launchers do: launch.py makes
each sweep point's job dir here and builds its Azure ML job (job.py: validation, the code
snapshot of snapshot.py with the task's payload of payload.py, job.yaml; inputs.py says which
config keys are inputs, secrets.py keeps credentials out), then dry-runs it, runs it here as
Azure ML would (emulate.py) or submits it: uploads its local inputs (storage.py), sends and
watches the batch (submit.py, workspace.py) and brings the results back (download.py). On the
nodes, remote.py runs the user's task function from the payload. Nothing in nlpwf below this
package knows which launcher runs a job.

This package imports nothing on its own: Hydra imports the launcher plugin at every start,
and the nodes run `python -m nlpwf.azureml.remote` without Azure's SDK installed.
"""
