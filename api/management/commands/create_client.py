"""`manage.py create_client NAME`: a new integrator, its API key and webhook secret as JSON."""

import json

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError

from api.models import Client


class Command(BaseCommand):
    help = "Create an integrator and print its API key and webhook secret (shown only this once)."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, name, **options):
        name = name.strip()
        if not name or len(name) > 100:
            raise CommandError("NAME must be 1 to 100 characters.")
        try:
            client, api_key = Client.create_with_credentials(name)
        except IntegrityError:
            raise CommandError(f"A client named {name!r} already exists.") from None
        self.stdout.write(json.dumps({"client": client.name, "api_key": api_key, "webhook_secret": client.webhook_secret}))
