"""How a job's processes start, find each other and share a machine: the distributed env
contract, threads per process, local worker processes, the job config file they re-enter
with, and the wording of a lost peer. Knows nothing of models or data."""
