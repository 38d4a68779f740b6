"""Telehealth: teleconsultation rooms (video Appointment -> WebRTC mesh with signaling)."""
