"""FLARE layer (the only one that imports nvflare): aggregator, filters, executor, workflows, report."""
