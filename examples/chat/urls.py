"""The chat example's pages: a room, and the announcement that a worker delivers."""

from django.urls import path
from django.views.generic.base import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/rooms/lobby/")),
    path("rooms/<slug:room>/", views.room),
    path("rooms/<slug:room>/announce", views.announce),
]
