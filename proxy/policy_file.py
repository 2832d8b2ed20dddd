"""Read POLICY_FILE (TOML): the action per content type and a fallback template per sender."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .addresses import SERVICE_SID, InvalidAddress, is_bsuid, normalise
from .rules import TABLE

ACTIONS = ("block", "reroute")
CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}\Z")  # \Z: `$` also accepts a trailing newline
# `{profile_name}` when the user's profile name is unknown (they never wrote: the usual reason to
# reroute) or blank: Twilio refuses a "" variable with 21656, so it is never left empty.
DEFAULT_PROFILE_NAME = "there"
FALLBACK_KEYS = ("content_sid", "variables", "profile_name_default")
_REFUSED_SPACING = re.compile(r"[\n\t]| {5}")


class PolicyFileError(ValueError):
    pass


@dataclass(frozen=True)
class Fallback:
    """An approved template sent instead of a blocked message."""

    content_sid: str
    variables: Mapping[str, str] = field(default_factory=dict)
    profile_name_default: str = DEFAULT_PROFILE_NAME

    def __post_init__(self):
        # Checked here, not only when a file is read: no fallback may ever render an empty variable.
        if not isinstance(self.profile_name_default, str) or not self.profile_name_default.strip():
            raise PolicyFileError("profile_name_default must be a non-empty string")
        blank = sorted(k for k, v in self.variables.items() if not v.strip())
        if blank:
            raise PolicyFileError(f"variables must not be empty (Twilio refuses them with 21656): {blank[0]!r}")
        # A name is rendered without spaces at its ends (render), so "x" stands for any.
        spaced = sorted(k for k, v in self.variables.items() if _REFUSED_SPACING.search(v.replace("{profile_name}", "x")))
        if spaced:
            raise PolicyFileError(f"variables must not hold a newline, a tab or more than four spaces in a row "
                                  f"(Twilio refuses them with 21656): {spaced[0]!r}")

    def render(self, profile_name: str | None) -> str | None:
        if not self.variables:
            return None
        # A user's name may hold what Twilio refuses in a variable (21656: a newline, a tab, more than four
        # spaces in a row): every run of whitespace becomes one space.
        name = " ".join((profile_name or "").split()) or " ".join(self.profile_name_default.split())
        return json.dumps({k: v.replace("{profile_name}", name) for k, v in self.variables.items()})


@dataclass(frozen=True)
class PolicyFile:
    actions: Mapping[str, str]
    fallbacks: Mapping[str, Fallback]


def parse_fallback(content_sid: object, variables: object, where: str, profile_name_default: object = None) -> Fallback:
    if not isinstance(content_sid, str) or not CONTENT_SID.match(content_sid):
        raise PolicyFileError(f"{where}: content_sid must look like HX followed by 32 hex characters")
    if variables is None:
        variables = {}
    if not isinstance(variables, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):
        raise PolicyFileError(f"{where}: variables must be a table (JSON object) of strings")
    try:
        return Fallback(content_sid, dict(variables),
                        DEFAULT_PROFILE_NAME if profile_name_default is None else profile_name_default)
    except PolicyFileError as exc:
        raise PolicyFileError(f"{where}: {exc}") from None


def load(path: str) -> PolicyFile:
    try:
        # utf-8-sig: a file an editor saved with a byte-order mark is still TOML.
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PolicyFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[:exc.start].count(b"\n") + 1
        raise PolicyFileError(f"{path} line {line}: not UTF-8 text (TOML files are UTF-8)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{path}: {exc}") from None  # tomllib names the line and column

    def at(key: str) -> str:
        """The line that sets `key`: as a whole key (bare, quoted; dotted, `actions."twilio/text" = …`; in a table
        header, spaced or not), not a comment that mentions it nor a longer key that starts with it."""
        lines = text.splitlines()
        # As written first, spaces only around the key: compacted, two spellings of one sender ("+1 415 555 0100"
        # and "+14155550100") are the same text, and the first one's line was named for the second.
        as_written = re.compile(r"(?:^|[\[.])\s*(?:%s|\"%s\"|'%s')\s*(?=[=.\]])" % ((re.escape(key),) * 3))
        compact = "".join(key.split())
        whole = re.compile(r"(?:^|[\[.])(?:%s|\"%s\"|'%s')(?=[=.\]])" % ((re.escape(compact),) * 3))
        for pattern, spelling in ((as_written, str.strip), (whole, lambda line: "".join(line.split()))):
            for number, line in enumerate(lines, start=1):
                if pattern.search(spelling(line)):
                    return f"{path} line {number}"
        for number, line in enumerate(lines, start=1):  # a spelling the pattern does not know: the first mention
            if key in line and not line.lstrip().startswith("#"):
                return f"{path} line {number}"
        return path

    unknown = set(data) - {"actions", "fallbacks"}
    if unknown:
        first = sorted(unknown)[0]
        raise PolicyFileError(f"{at(first)}: unknown section {first!r} (expected [actions] and [fallbacks])")
    for section in ("actions", "fallbacks"):
        if not isinstance(data.get(section, {}), Mapping):
            raise PolicyFileError(f"{at(section)}: {section} must be a table ([{section}])")
    actions = {}
    for content_type, action in (data.get("actions") or {}).items():
        if content_type not in TABLE:
            raise PolicyFileError(f"{at(content_type)}: unknown content type {content_type!r}")
        if action not in ACTIONS:
            raise PolicyFileError(f"{at(content_type)}: action for {content_type!r} must be block or reroute")
        actions[content_type] = action
    fallbacks = {}
    for sender, spec in (data.get("fallbacks") or {}).items():
        where = at(sender)
        if not isinstance(spec, Mapping):
            raise PolicyFileError(f"{where}: fallback for {sender!r} must be a table with content_sid")
        unknown = sorted(set(spec) - set(FALLBACK_KEYS))
        if unknown:  # a misspelt profile_name_default would otherwise be ignored without a word
            raise PolicyFileError(f"{where}: unknown key {unknown[0]!r} in the fallback for {sender!r} "
                                  f"(expected {', '.join(FALLBACK_KEYS)})")
        if sender.startswith("MG") and not SERVICE_SID.fullmatch(sender):
            # It would never match a send, and still counted as the fallback OUT_OF_WINDOW_ACTION=reroute needs.
            raise PolicyFileError(f"{where}: {sender!r} is not a Messaging Service SID (MG and 32 hex digits)")
        try:
            key = sender if sender.startswith("MG") else normalise(sender)
        except InvalidAddress as exc:
            raise PolicyFileError(f"{where}: {exc}") from None
        if key in fallbacks:  # two spellings of one sender: the later replaced the earlier without a word
            raise PolicyFileError(f"{where}: the fallback for {sender!r} is a second one for {key!r}")
        if is_bsuid(key):  # a user's id: a send from it is refused (21212), so its fallback would never be used
            raise PolicyFileError(f"{where}: {sender!r} is a WhatsApp user's id (a BSUID), not a business sender")
        if not key.startswith(("MG", "whatsapp:")):  # a plain number is an SMS sender: it never matched a send
            raise PolicyFileError(f"{where}: fallback sender {sender!r} must be a WhatsApp sender "
                                  f"(\"whatsapp:+14155550100\") or a Messaging Service (MG...): templates are "
                                  f"sent instead of blocked WhatsApp messages only")
        fallbacks[key] = parse_fallback(spec.get("content_sid"), spec.get("variables"), where,
                                        spec.get("profile_name_default"))
    return PolicyFile(actions, fallbacks)
