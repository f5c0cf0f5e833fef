"""Studies that drive a family through the spine (evaluator, plots): TOVA's perplexity-vs-budget sweep and the
kept-token analysis. They live here so no family package imports the evaluator or the trainer."""
