"""The prompts the app runs by itself: the page's examples (the start-up warm-up runs the first)
and the compare endpoint's test prompt."""

# The prompt of `bench --served`'s calls of the compare endpoint, served and in-process alike
# (docs/the-app.md's gradio_client example sends the same)
API_PROMPT = "def f(x):"
EXAMPLES = [
    "def fibonacci(n):\n    ",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    'import os\n\n\ndef list_files(directory):\n    """Return',
    "The module provides functions for",
]
