"""The lab: what ATS costs and buys, measured. It imports the reference (ats, baselines, train);
the reference never imports it. Run its scripts from the repository root, as modules:
python -m experiments.converge --quick."""
