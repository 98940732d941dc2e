"""Progress bars: ``tqdm``, shown only where someone is watching.

``enable=None`` shows the bar only when standard error is a terminal (tqdm's own ``disable=None``
rule), so logs, pipes and tests stay clean; ``enable=False`` never shows it; ``enable=True`` always
does. The bar is removed when it closes (``leave=False``). Log records do not break a bar when the
application wraps its work in :func:`tqdm.contrib.logging.logging_redirect_tqdm` (the ``gradprune``
command does).

Example:
    >>> import io
    >>> class Terminal(io.StringIO):
    ...     def isatty(self):
    ...         return True
    >>> screen = Terminal()
    >>> with progress(total=3, desc="scores", file=screen) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> "scores" in screen.getvalue()
    True
    >>> quiet = io.StringIO()  # not a terminal: nothing is drawn
    >>> with progress(total=3, desc="scores", file=quiet) as bar:
    ...     bar.update(3)
    >>> quiet.getvalue()
    ''
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(total: int | None = None, desc: str = "", enable: bool | None = None, file=None) -> tqdm:
    """A ``tqdm`` bar on ``file`` (default: standard error at call time); see the module docs."""
    return tqdm(total=total, desc=desc, leave=False, file=file if file is not None else sys.stderr,
                disable=None if enable is None else not enable, dynamic_ncols=True)
