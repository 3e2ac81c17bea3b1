"""A synthetic Cytologia data set the project makes itself (the default data of demo, tests and benchmarks)."""
