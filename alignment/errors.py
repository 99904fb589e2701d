"""The one exception every bad input becomes: `RecipeError`, whose message is one line naming the
file, row or key and the fix. It sits below every other module (the schema, paths, data, models
all raise it), so importing it creates no circle."""


class RecipeError(Exception):
    """A recipe (or an override, or a data file) is malformed; the message is one line."""
