"""The navigation of the patient portal and of the professional workspace.

Features hang their pages here: a feature that ships its pages sets
``available=True`` on its item and registers its own route for ``path``. Items
not yet available lead to an honest "coming soon" page.
"""

from __future__ import annotations

from dataclasses import dataclass

PORTAL, WORKSPACE = "portal", "workspace"


@dataclass(frozen=True)
class NavItem:
    key: str
    path: str
    label: str  # message key
    description: str  # message key, shown on the home page cards
    available: bool = False
    roles: frozenset[str] = frozenset()  # empty = every role of the space


PORTAL_NAV: tuple[NavItem, ...] = (
    NavItem("home", "/portal", "nav.home", "portal.home.lead", available=True),
    NavItem("appointments", "/portal/appointments", "nav.appointments", "portal.card.appointments", available=True),
    NavItem("records", "/portal/records", "nav.records", "portal.card.records", available=True),
    NavItem("messages", "/portal/messages", "nav.messages", "portal.card.messages", available=True),
    NavItem("telehealth", "/portal/telehealth", "nav.telehealth", "portal.card.telehealth", available=True),
    NavItem("monitoring", "/portal/monitoring", "nav.monitoring", "portal.card.monitoring"),
    NavItem("access_history", "/portal/access-history", "nav.access_history", "portal.card.access_history", available=True),
    NavItem("privacy", "/portal/privacy", "nav.privacy", "portal.card.privacy", available=True, roles=frozenset({"patient"})),
    NavItem("account", "/account", "nav.account", "portal.card.account", available=True),
)

WORKSPACE_NAV: tuple[NavItem, ...] = (
    NavItem("home", "/workspace", "nav.home", "workspace.home.lead", available=True),
    NavItem("agenda", "/workspace/agenda", "nav.agenda", "workspace.card.agenda", available=True,
            roles=frozenset({"practitioner", "staff"})),
    NavItem("patients", "/workspace/patients", "nav.patients", "workspace.card.patients", available=True,
            roles=frozenset({"practitioner"})),
    NavItem("lab_inbox", "/workspace/lab-inbox", "nav.lab_inbox", "workspace.card.lab_inbox", available=True,
            roles=frozenset({"staff", "admin"})),
    NavItem("messages", "/workspace/messages", "nav.messages", "workspace.card.messages", available=True,
            roles=frozenset({"practitioner"})),
    NavItem("telehealth", "/workspace/telehealth", "nav.telehealth", "workspace.card.telehealth", available=True),
    NavItem("expertise", "/workspace/expertise", "nav.expertise", "workspace.card.expertise", available=True,
            roles=frozenset({"practitioner"})),
    NavItem("stroke", "/workspace/stroke", "nav.stroke", "workspace.card.stroke", available=True,
            roles=frozenset({"practitioner"})),
    NavItem("directory", "/workspace/directory", "nav.directory", "workspace.card.directory"),
    NavItem("administration", "/workspace/administration", "nav.administration", "workspace.card.administration",
            available=True, roles=frozenset({"admin"})),
    NavItem("emergency", "/workspace/emergency-access", "nav.emergency", "workspace.card.emergency", available=True,
            roles=frozenset({"practitioner"})),
    NavItem("account", "/account", "nav.account", "workspace.card.account", available=True),
)

NAV = {PORTAL: PORTAL_NAV, WORKSPACE: WORKSPACE_NAV}
HOME = {PORTAL: "/portal", WORKSPACE: "/workspace"}


def items_for(space: str, role: str) -> list[NavItem]:
    return [i for i in NAV[space] if not i.roles or role in i.roles]
