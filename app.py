"""TurboSparse Studio: `python app.py` serves the comparison app (see README)."""

if __name__ == "__main__":
    raise SystemExit("The comparison app is not built yet; use `python -m turbo_demo --help`.")
