"""Booking: opening rules, slots, appointments, waiting lists and their notifications.

``model`` (FHIR shapes), ``generation`` (rules -> Slots), ``rules`` (the write rule that
keeps Appointments and Slots consistent), ``service`` (book, cancel, move, agenda),
``waitlist``, ``notify`` (e-mail, SMS, queue runner), ``feed`` (private iCalendar
feeds), ``directory_slots`` (next free slots in directory results), ``demo``.
See docs/booking.md.
"""
