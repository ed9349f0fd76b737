"""Fixed-attribute bundles: the parts of the program one component is given.

A subclass of `Parts` names its attributes in `__slots__`. Every attribute
starts as None (or as a new empty list, for those named in `LISTS`);
keyword arguments set some. A name that is not an attribute raises
AttributeError, when given and when assigned later, so a misspelt part
never passes silently.
"""


class Parts:
    """A bundle of named parts; see the module docstring."""

    __slots__ = ()
    LISTS = ()

    def __init__(self, **kwargs):
        for name in self.__slots__:
            setattr(self, name, [] if name in self.LISTS else None)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def copy(self, **changes):
        """A new bundle of the same kind with the same parts, `changes` applied."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)
