"""What a path is, in words, for one-line errors about files that are not regular files.

One wording everywhere (bundles, --baseline reports and artifacts): a FIFO or a link loop is
named as such, never reported as "missing", so the user knows what to fix.
"""

from __future__ import annotations

import stat


def describe_mode(mode: int) -> str:
    """'a symbolic link', 'a folder', 'a FIFO', 'a socket', 'a device file' or 'not a regular file'
    for an lstat()/stat() mode that is not a regular file's."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"
