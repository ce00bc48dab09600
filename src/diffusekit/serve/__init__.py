"""``diffusekit serve``: a local HTTP server over one loaded model -- the community ``/sdapi/v1`` API subset, a
first-in-first-out job queue with one worker that owns the model, server-sent progress events, and a plain
web page (``static/``: HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere).

Layout: ``community`` (the API's fields -> recipes), ``images`` (bounded base64 image decoding),
``jobs`` (queue and job states), ``worker`` (the model thread), ``service`` (what the routes call),
``security`` (token, origin, host and body-size gate), ``app`` (the routes; FastAPI). Only ``app`` needs the
``serve`` extra.
"""
