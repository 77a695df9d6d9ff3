"""The pipeline's roles, in data-flow order: explorer -> transport -> buffer -> learner;
launch supervises them as processes, config describes a run."""
