"""HTTP side of the chat example.

``announce`` does not talk to the room itself: it hands the text to the ``chat-announce``
normal channel, and whichever ``runworker chat-announce`` process takes it posts it to the
room. That is the Channels pattern for work done outside the web process.

``metrics`` serves prometheus_client's default registry, where importing
``multilayer.metrics`` put the layer's counters (django-prometheus's ``/metrics`` serves
the same registry).
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import multilayer.metrics  # noqa: F401 (registers the layer's collector)

#: The normal channel the worker consumes (``python -m django runworker chat-announce``).
ANNOUNCE_CHANNEL = "chat-announce"


def room(request: HttpRequest, room: str) -> HttpResponse:
    """The chat page of ``room``."""
    return render(request, "chat/room.html", {"room": room})


# An API endpoint for scripts (curl, the tests): it has no session, so no CSRF token.
@csrf_exempt
@require_POST
def announce(request: HttpRequest, room: str) -> HttpResponse:
    """Queue ``text`` (form field) for the worker, which announces it in ``room``."""
    text = request.POST.get("text", "").strip()
    if not text:
        return HttpResponseBadRequest("the form field 'text' is missing or empty\n")
    async_to_sync(get_channel_layer().send)(
        ANNOUNCE_CHANNEL, {"type": "chat.announce", "room": room, "text": text}
    )
    return JsonResponse({"queued": True, "channel": ANNOUNCE_CHANNEL}, status=202)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this process, its channel layer's included."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
