"""Training on a project's annotations: the job store, trained versions, examples, the run, the trainer process."""
