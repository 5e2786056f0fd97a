"""Running stages: the executor, clusters, worker set-up, fault injection, figures."""
