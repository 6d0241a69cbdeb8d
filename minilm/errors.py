"""The one exception type minilm raises for bad input.

Every message names the offending value, says what was expected and how to fix it. The CLI catches
`MinilmError` and prints its message without a traceback; anything else is a bug and keeps its
traceback.
"""


class MinilmError(ValueError):
    """Bad input from a person: a config, a file, a prompt. The message is the whole explanation."""
