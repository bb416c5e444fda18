"""Tables, plots and figures of the paper's appendix, from metrics files and predictions."""
