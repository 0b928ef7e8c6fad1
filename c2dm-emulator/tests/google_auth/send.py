"""Google's own Python client against the emulator: a token from its FCM token endpoint with
google-auth's service-account credentials, then one message sent with it.

Usage: send.py KEY_FILE CA_CERT SEND_URL TOKEN
Prints the accepted message's name.
"""
import json
import sys

import google.auth.transport.requests
import requests
from google.oauth2 import service_account

key_file, ca_cert, send_url, device = sys.argv[1:5]
session = requests.Session()
session.verify = ca_cert
# Only this certificate, and no proxy: whatever the environment says (REQUESTS_CA_BUNDLE would
# otherwise replace `verify`).
session.trust_env = False
credentials = service_account.Credentials.from_service_account_file(
    key_file, scopes=["https://www.googleapis.com/auth/firebase.messaging"]
)
credentials.refresh(google.auth.transport.requests.Request(session))
answer = session.post(
    send_url,
    headers={"Authorization": "Bearer " + credentials.token},
    json={"message": {"token": device, "data": {"from_python": "yes"}}},
)
answer.raise_for_status()
print(answer.json()["name"])
