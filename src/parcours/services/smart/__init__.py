"""SMART on FHIR for other software: the authorization server (App Launch 2.x and Backend
Services, ``server``), its discovery documents (``discovery``), the consent page's rules
(``consent``) and client registration (``clients``)."""

from parcours.services.smart.clients import NewClient, check_new_client, list_clients, register_client, set_client_active
from parcours.services.smart.consent import FORM_ONLY, ConsentView, PatientChoice, ScopeLine
from parcours.services.smart.discovery import Endpoints, openid_configuration, smart_configuration
from parcours.services.smart.server import GrantedUser, HttpRequest, OAuthResponse, RevocationCache, Smart

__all__ = [
    "FORM_ONLY", "ConsentView", "Endpoints", "GrantedUser", "HttpRequest", "NewClient", "OAuthResponse", "PatientChoice",
    "RevocationCache", "ScopeLine", "Smart", "check_new_client", "list_clients", "openid_configuration", "register_client",
    "set_client_active", "smart_configuration",
]
