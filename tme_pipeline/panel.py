"""Map a slide's channel names to the panel's markers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import MarkerSpec

__all__ = ["PanelMatch", "match_panel", "normalise_name"]


@dataclass(frozen=True)
class PanelMatch:
    """Which slide channel carries each marker.

    Attributes
    ----------
    channels : dict of str to int
        Marker name -> channel index in the slide (only markers found).
    missing_optional : tuple of str
        Optional markers the slide does not carry.
    """

    channels: dict[str, int]
    missing_optional: tuple[str, ...] = ()

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(self.channels)


def normalise_name(name: str) -> str:
    """Channel-name key used for matching: lower case, no spaces, ``-``, ``_`` or ``.``.

    >>> normalise_name("PD-L1") == normalise_name("pd_l1") == normalise_name("PDL1")
    True
    """
    return re.sub(r"[\s\-_.]+", "", name).lower()


def match_panel(
    channel_names: Sequence[str],
    panel: Mapping[str, MarkerSpec],
    *,
    channel_map: Mapping[str, str] | None = None,
    source: str = "slide",
) -> PanelMatch:
    """Find the channel of each panel marker.

    An explicit ``channel_map`` entry wins; otherwise a channel matches a marker when
    its normalised name equals the normalised marker name or one of its aliases.

    Parameters
    ----------
    channel_names : sequence of str
        The slide's channel names, in channel order.
    panel : mapping of str to MarkerSpec
        The configured markers.
    channel_map : mapping of str to str, optional
        Slide channel name -> marker, for names no alias can guess ("Opal 520").
    source : str
        The slide (path or id) named in error messages.

    Returns
    -------
    PanelMatch

    Raises
    ------
    ValueError
        If a required marker has no channel, or two channels claim the same marker.
    """
    channel_map = dict(channel_map or {})
    keys = {}
    for marker, spec in panel.items():
        for alias in (marker, *spec.aliases):
            keys.setdefault(normalise_name(alias), marker)

    claims: dict[str, list[int]] = {}
    explicit = {normalise_name(name): marker for name, marker in channel_map.items()}
    for index, name in enumerate(channel_names):
        key = normalise_name(name)
        marker = explicit.get(key) or keys.get(key)
        if marker is not None:
            claims.setdefault(marker, []).append(index)

    for marker, indices in claims.items():
        if len(indices) > 1:
            names = ", ".join(repr(channel_names[i]) for i in indices)
            raise ValueError(f"{source}: channels {names} all match panel marker {marker!r}")

    missing = [m for m in panel if m not in claims]
    required = [m for m in missing if not panel[m].optional]
    if required:
        raise ValueError(
            f"{source}: panel marker(s) {', '.join(map(repr, required))} not found among the "
            f"slide's channels ({', '.join(map(repr, channel_names))}){_why_unmatched(channel_names)}; "
            "add the channel name to the marker's aliases or to channel_map in the config"
        )
    channels = {m: claims[m][0] for m in panel if m in claims}
    return PanelMatch(channels=channels, missing_optional=tuple(missing))


def _why_unmatched(channel_names: Sequence[str]) -> str:
    """What about the slide's channels explains a missing marker, for the error message."""
    if len(channel_names) == 1:
        return " (the slide has a single channel: a 2-D image, not a multiplex slide)"
    unnamed = [name for index, name in enumerate(channel_names) if name == f"C{index}"]
    if unnamed:
        return (f" (channel(s) {', '.join(unnamed)} have no name in the slide's metadata and are called by "
                "position; name them with channel_map, e.g. {C0: DAPI}, or for a plain TIFF with channel_names)")
    return ""
