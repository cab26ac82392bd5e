"""Commands beside the app: generate (one model, one prompt, statistics) and the load tester."""
