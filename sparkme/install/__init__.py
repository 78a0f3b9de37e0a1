"""Installing what PyPI cannot: MinkowskiEngine built from its sdist with the project's patches."""
