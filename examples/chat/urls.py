"""The chat example's pages: a room, the announcement that a worker delivers, and metrics."""

from django.urls import path
from django.views.generic.base import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/rooms/lobby/")),
    path("rooms/<slug:room>/", views.room),
    path("rooms/<slug:room>/announce", views.announce),
    path("metrics", views.metrics),
]
