"""Secure messaging in two real browsers talking to each other (Debian's Chromium, Playwright).

A patient on a phone writes to her GP, who has his inbox open on a desktop: the
conversation appears in his inbox without a reload, and from then on each side sees the
other's messages arrive live, with read receipts. Then two professionals chat the same
way, one finding the other in the directory. axe-core finds no serious or critical
violation on the inbox, the new-conversation page and the conversation page (French and
English), which run under their Content-Security-Policy without console errors.
"""

from __future__ import annotations

from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, totp_now
from tests.messaging_helpers import make_world
from tests.test_pages_browser import axe_violations, browser, new_page

__all__ = ["browser"]  # the module-scoped Chromium of the page tests
LIVE = 15_000  # ms: a message must show up on the other side within this
# Lets the test cut a page's websockets as a lost network or a restarted worker would.
DROPPABLE = """(() => {
  const Original = window.WebSocket, open = [];
  window.WebSocket = class extends Original { constructor(...a) { super(...a); open.push(this); } };
  window.__dropSockets = () => open.forEach((s) => s.close());
})();"""


async def sign_in(page, live_server: str, email: str, *, lang: str, secret: str | None = None, platform=None) -> None:  # type: ignore[no-untyped-def]
    labels = {"fr": ("Adresse e-mail", "Mot de passe", "Se connecter", "Code de vérification", "Vérifier"),
              "en": ("E-mail address", "Password", "Sign in", "Verification code", "Verify")}[lang]
    await page.goto(live_server + "/signin")
    await page.get_by_label(labels[0]).fill(email)
    await page.get_by_label(labels[1]).fill(PASSWORD)
    await page.get_by_role("button", name=labels[2]).click()
    if secret:
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label(labels[3]).fill(totp_now(secret, platform.clock.now()))
        await page.get_by_role("button", name=labels[4]).click()
        await page.wait_for_url("**/workspace")
    else:
        await page.wait_for_url("**/portal")


async def live(page) -> None:  # type: ignore[no-untyped-def]
    """The page's socket is connected and caught up."""
    await page.locator(".messaging[data-live='ready']").wait_for(timeout=LIVE)


async def test_a_patient_and_her_gp_chat_live(browser, live_server: str, client, platform) -> None:  # type: ignore[no-untyped-def]
    secret = totp_codes.new_secret()
    w = await make_world(client, platform, totp={"gp": secret}, accounts=("patient", "gp"))
    errors: list[str] = []
    gp_ctx, gp = await new_page(browser, "fr-FR", errors)
    pat_ctx, pat = await new_page(browser, "en-GB", errors, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    await gp_ctx.add_init_script(DROPPABLE)
    try:
        await sign_in(gp, live_server, w.gp.account.email, lang="fr", secret=secret, platform=platform)
        await gp.get_by_role("navigation").get_by_role("link", name="Messagerie").click()
        await gp.wait_for_url("**/workspace/messages")
        await gp.get_by_role("heading", level=1, name="Messagerie sécurisée").wait_for()
        await live(gp)
        assert await axe_violations(gp) == []

        await sign_in(pat, live_server, w.patient.account.email, lang="en")
        await pat.goto(live_server + "/portal/messages")
        await pat.get_by_role("heading", level=1, name="Secure messages").wait_for()
        assert await axe_violations(pat) == []
        await pat.get_by_role("link", name="New conversation").click()
        await pat.get_by_role("heading", level=1, name="New conversation").wait_for()
        # Her care team is offered; the professional she blocked is not.
        await pat.get_by_role("link", name=f"Add {w.gp.name}").click()
        assert await pat.get_by_role("link", name=f"Add {w.blocked.name}").count() == 0
        assert await axe_violations(pat) == []
        await pat.get_by_label("Subject").fill("Renouvellement d'ordonnance")
        await pat.get_by_label("Your message").fill("Bonjour docteur, pouvez-vous renouveler mon traitement ?")
        await pat.get_by_role("button", name="Send").click()
        await pat.wait_for_url("**/portal/messages/*")
        await live(pat)
        assert await pat.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # usable on a phone

        # On the GP's screen the conversation appears in the inbox, with no reload.
        link = gp.get_by_role("link", name="Renouvellement d'ordonnance")
        await link.wait_for(timeout=LIVE)
        assert "1 non lu(s)" in await gp.locator("#conversations").inner_text()
        await link.click()
        await live(gp)
        await gp.get_by_text("pouvez-vous renouveler mon traitement").wait_for()
        assert await axe_violations(gp) == []
        # He opened it: her message shows it was read, on her phone, live.
        await pat.get_by_text(f"Read by {w.gp.name}").wait_for(timeout=LIVE)

        await gp.get_by_label("Votre message").fill("C'est fait, l'ordonnance est prête à l'accueil.")
        await gp.get_by_role("button", name="Envoyer").click()
        await pat.get_by_text("l'ordonnance est prête").wait_for(timeout=LIVE)
        assert await gp.locator("#msg-text").input_value() == ""  # posted with htmx, the form is ready again

        await pat.get_by_role("button", name=f"Reply to {w.gp.name}").last.click()
        await pat.get_by_label("Your message").fill("Merci beaucoup !")
        await pat.get_by_role("button", name="Send").click()
        await gp.get_by_text("Merci beaucoup !").wait_for(timeout=LIVE)
        assert await gp.locator("#messages > li").count() == 3
        assert await pat.locator("#messages > li").count() == 3  # each once, whatever came twice
        assert await axe_violations(pat) == []

        # The GP's socket drops (a worker restarts...): he reconnects and gets what he missed.
        await gp_ctx.set_offline(True)  # no reconnection for now...
        await gp.evaluate("window.__dropSockets()")  # ...and the socket is gone
        await gp.locator(".messaging[data-live='closed']").wait_for(timeout=LIVE)
        await pat.get_by_label("Your message").fill("Et pour la prise de sang ?")
        await pat.get_by_role("button", name="Send").click()
        await pat.get_by_text("Et pour la prise de sang ?").wait_for()
        await gp_ctx.set_offline(False)
        await gp.get_by_text("Et pour la prise de sang ?").wait_for(timeout=30_000)
        assert await gp.locator("#messages > li").count() == 4
        assert errors == [] or all("ERR_INTERNET_DISCONNECTED" in e or "WebSocket" in e for e in errors), errors
    finally:
        await gp_ctx.close()
        await pat_ctx.close()


async def test_two_professionals_chat_live(browser, live_server: str, client, platform) -> None:  # type: ignore[no-untyped-def]
    secrets = {"gp": totp_codes.new_secret(), "open": totp_codes.new_secret()}
    w = await make_world(client, platform, totp=secrets, accounts=("gp", "open"))
    errors: list[str] = []
    a_ctx, a = await new_page(browser, "fr-FR", errors)
    b_ctx, b = await new_page(browser, "en-GB", errors)
    try:
        await sign_in(a, live_server, w.gp.account.email, lang="fr", secret=secrets["gp"], platform=platform)
        await sign_in(b, live_server, w.open.account.email, lang="en", secret=secrets["open"], platform=platform)
        await b.goto(live_server + "/workspace/messages")
        await live(b)
        assert await axe_violations(b) == []

        await a.goto(live_server + "/workspace/messages/new")
        await a.get_by_label("Chercher un professionnel par son nom").fill(w.open.name.split()[-1])
        await a.get_by_role("button", name="Rechercher").first.click()
        await a.get_by_role("link", name=f"Ajouter {w.open.name}").click()
        assert await axe_violations(a) == []
        await a.get_by_label("Objet").fill("Avis sur un électrocardiogramme")
        await a.get_by_label("Votre message").fill("Peux-tu regarder cet ECG ?")
        await a.get_by_role("button", name="Envoyer").click()
        await a.wait_for_url("**/workspace/messages/*")
        await live(a)

        await b.get_by_role("link", name="Avis sur un électrocardiogramme").click(timeout=LIVE)
        await live(b)
        await b.get_by_text("Peux-tu regarder cet ECG ?").wait_for()
        assert await axe_violations(b) == []
        await b.get_by_label("Your message").fill("Rythme sinusal, rien d'inquiétant.")
        await b.get_by_role("button", name="Send").click()
        await a.get_by_text("Rythme sinusal").wait_for(timeout=LIVE)
        await a.get_by_label("Votre message").fill("Merci !")
        await a.get_by_role("button", name="Envoyer").click()
        await b.get_by_text("Merci !").wait_for(timeout=LIVE)
        assert await a.locator("#messages > li").count() == 3 and await b.locator("#messages > li").count() == 3
        assert await axe_violations(a) == []
        assert errors == [], errors
    finally:
        await a_ctx.close()
        await b_ctx.close()
