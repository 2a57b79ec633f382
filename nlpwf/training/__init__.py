"""Fine-tuning with transformers' Trainer and nlpwf's additions to it: checkpoints that are
complete or absent, resume, stop on SIGTERM, line progress, tracking, CPU tuning and a record
of what ran."""
