"""The machinery: the stage list and its records, executors, the cost estimate, export, kernels, comparison."""
