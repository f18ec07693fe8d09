"""JSON read from files the user can edit (configs, manifests, metadata, run records).

Python's parser recurses once per nesting level, so a file of a few thousand ``[`` raises RecursionError,
which no reader expects; here it is the ValueError of any other unreadable JSON, so every reader's
existing "cannot be read" sentence covers it.
"""
import json


def loads(text):
    """``json.loads``, with nesting too deep for the parser raised as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None
