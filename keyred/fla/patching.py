"""The one way keyred replaces names inside fla (keyred.fla.sites lists them all).

`patched(sites, wrap)` replaces each site's current object with `wrap(site, current)` for the
duration of a block and puts back exactly what it found, in reverse order, whatever happens.
`install(sites, wrap)` does the same for good (the CPU seam). The stacking order of the
replacements is written down in keyred.fla.sites.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

from keyred.fla.sites import SUPPORTED_FLA_VERSION, Site


class UnsupportedFlaError(RuntimeError):
    """The installed fla is not the one the sites were read in, or lacks a site."""


def owner_of(site: Site) -> tuple[object, str]:
    """The module or class that holds the site's name, and the name; UnsupportedFlaError if fla has none."""
    try:
        owner = importlib.import_module(site.module)
    except ImportError as error:
        raise UnsupportedFlaError(f"keyred replaces {site.where}, but {site.module} cannot be imported "
                                  f"({error}); is fla {SUPPORTED_FLA_VERSION} installed?") from error
    *path, name = site.attribute.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    if owner is None or not hasattr(owner, name):
        raise UnsupportedFlaError(f"keyred replaces {site.where}, which does not exist in the installed fla; "
                                  f"update keyred.fla.sites.SITES for this fla release")
    return owner, name


Wrap = Callable[[Site, Callable], Callable]


def install(sites: Iterable[Site], wrap: Wrap) -> list[tuple[object, str, Callable]]:
    """Replace every site's object with wrap(site, current); return (owner, name, previous) per
    site, in order. Every site is found before any is replaced."""
    targets = [(site, *owner_of(site)) for site in sites]
    replaced = []
    for site, owner, name in targets:
        current = getattr(owner, name)
        setattr(owner, name, wrap(site, current))
        replaced.append((owner, name, current))
    return replaced


@contextlib.contextmanager
def patched(sites: Iterable[Site], wrap: Wrap) -> Iterator[None]:
    """Within the block, each site holds wrap(site, what it held before); restored after, in reverse."""
    replaced = []
    try:
        replaced = install(sites, wrap)
        yield
    finally:
        for owner, name, previous in reversed(replaced):
            setattr(owner, name, previous)
