"""The one way keyred replaces names inside fla (keyred.fla.sites lists them all).

`patched(sites, wrap)` replaces each site's current object with `wrap(site, current)` for the
duration of a block and puts back exactly what it found, in reverse order, whatever happens.
`install(sites, wrap)` does the same for good (the CPU seam). No other keyred module sets
attributes on fla's modules or classes (tests/test_patching.py checks the source). The stacking
order of the replacements is written down in keyred.fla.sites.

Importing this module is cheap (no torch, no fla: fla's modules are imported by name on use).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

from keyred.fla.sites import SUPPORTED_FLA_VERSION, Site

__all__ = ["UnsupportedFlaError", "Wrap", "current", "install", "owner_of", "patched"]

Wrap = Callable[[Site, Callable], Callable]   # (site, what it holds now) -> what it holds next
_ABSENT = object()                            # the owner's own namespace did not hold the name


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


def current(site: Site) -> Callable:
    """What fla's code finds at the site now (as `getattr` gives it)."""
    owner, name = owner_of(site)
    return getattr(owner, name)


def install(sites: Iterable[Site], wrap: Wrap) -> list[tuple[object, str, object]]:
    """Replace every site's object with wrap(site, current), in order; return (owner, name, raw
    previous entry of the owner's namespace) per site. Every site is found before any is
    replaced; if a wrap fails, the sites replaced so far are put back before the error propagates."""
    targets = [(site, *owner_of(site)) for site in sites]
    replaced: list[tuple[object, str, object]] = []
    try:
        for site, owner, name in targets:
            previous = vars(owner).get(name, _ABSENT)   # a staticmethod stays a staticmethod on restore
            setattr(owner, name, wrap(site, getattr(owner, name)))
            replaced.append((owner, name, previous))
    except BaseException:
        _restore(replaced)
        raise
    return replaced


def _restore(replaced: list[tuple[object, str, object]]) -> None:
    """Undo `install`'s replacements, last first."""
    for owner, name, previous in reversed(replaced):
        if previous is _ABSENT:
            delattr(owner, name)             # it was inherited (a class) and is again
        else:
            setattr(owner, name, previous)


@contextlib.contextmanager
def patched(sites: Iterable[Site], wrap: Wrap) -> Iterator[None]:
    """Within the block, each site holds wrap(site, what it held before); restored after, in reverse."""
    replaced = install(sites, wrap)
    try:
        yield
    finally:
        _restore(replaced)
