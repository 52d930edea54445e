"""Who may do what, in which mode: the policy table the command bus consults.

A command's source ("button", "fob:<id>", "itag:<addr>", "bthome:<addr>", "host", "cli",
"policy", "mqtt:<topic kind>") falls
in a source class; each (class, action) cell holds a rule:
  always   - allowed in every mode
  unlocked - allowed only while UNLOCKED
  never    - refused
The defaults follow issue 4; `[policy.<class>]` tables in the config override single cells.
UNLOCK is a person's gesture: only the GESTURE_CLASSES may ever run it, whatever the table
says (the config refuses a table that tries), so host software, iTags, restore policies and
any network source can neither open nor extend an unlock.
"""

from __future__ import annotations

from appliance.control.commands import Action, Command, Mode

SOURCE_CLASSES = ("button", "fob", "commodity", "bthome", "host", "cli", "policy", "mqtt")
ACTIONS = tuple(a.value for a in Action)
RULES = ("always", "unlocked", "never")
GESTURE_CLASSES = ("button", "fob", "cli")  # a person's hand: the only ones that UNLOCK
# A keyed BTHome button's press is a person's too, but it answers no challenge: only its own
# switch ([bthome] allow_unlock, never a [policy] table) opens its UNLOCK cell.
UNLOCK_OPT_IN = ("bthome",)

_DEFAULTS: dict[str, dict[str, str]] = {
    # the enclosure button and the local admin CLI: deliberate gestures, may do everything
    "button": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "always",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "always",
    },
    "cli": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "always",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "always",
    },
    # an authenticated (paired, challenge-checked) fob: may unlock, may not open pairing
    "fob": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "always",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
    # commodity fobs (iTag etc.) cannot prove who they are: never RESTORE or UNLOCK
    "commodity": {
        "save": "unlocked",
        "restore": "never",
        "unlock": "never",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
    # encrypted BTHome buttons (ble/bthome_*.py): the key proves the button, but a button cannot
    # answer a challenge, so UNLOCK stays off unless [bthome] allow_unlock opens it
    "bthome": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "never",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
    # software on the host computer: STATUS, SAVE while UNLOCKED, RESTORE; never unlock itself
    "host": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "never",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
    # restore policies (on_boot, schedule, ...): only RESTORE and read-only queries
    "policy": {
        "save": "never",
        "restore": "always",
        "unlock": "never",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
    # an admin over an MQTT broker (mqtt/): anyone the broker lets publish a command can be
    # behind it, so never UNLOCK (no table may open it) and SAVE only inside a person's unlock
    "mqtt": {
        "save": "unlocked",
        "restore": "always",
        "unlock": "never",
        "lock": "always",
        "status": "always",
        "history": "always",
        "pair": "never",
    },
}


def default_policy() -> dict[str, dict[str, str]]:
    return {cls: dict(rules) for cls, rules in _DEFAULTS.items()}


def source_class(command: Command) -> str | None:
    """The policy class of a command's source, or None for a source nobody knows."""
    kind = command.source.split(":", 1)[0]
    if kind in ("fob", "itag"):
        return "fob" if command.authenticated and kind == "fob" else "commodity"
    if kind == "bthome":
        return "bthome" if command.authenticated else "commodity"
    if kind in ("button", "cli", "host", "policy", "mqtt"):
        # a source that says it is unauthenticated gets the commodity rules, whatever its name
        return kind if command.authenticated else "commodity"
    return None


def decide(table: dict[str, dict[str, str]], command: Command, mode: Mode) -> str:
    """'' when the command may run, else the reason it is refused (one line, for the user)."""
    cls = source_class(command)
    if cls is None:
        return f"unknown source {command.source!r}"
    rule = table[cls].get(command.action.value, "never")
    if (
        command.action is Action.UNLOCK
        and rule != "never"
        and cls not in GESTURE_CLASSES + UNLOCK_OPT_IN
    ):
        return (
            f"UNLOCK needs a person's gesture (button, authenticated fob or the "
            f"appliance's admin CLI); source {command.source!r} can never unlock"
        )
    if rule == "always":
        return ""
    if rule == "unlocked":
        if mode is Mode.UNLOCKED:
            return ""
        how = "press the button or use an authenticated fob or `savepoint unlock`"
        return f"{command.action.value.upper()} refused: the appliance is LOCKED ({how} first)"
    who = "unauthenticated fob" if cls == "commodity" else f"source {command.source!r}"
    return f"{command.action.value.upper()} is not allowed from {who} (policy.{cls})"
