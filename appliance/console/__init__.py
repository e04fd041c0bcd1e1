"""The web console and REST API of a node (Flask under gunicorn, HTTPS on :9010).

create_app (app.py) wires api.py (/api/v1, /peer/v1, /health...) and views.py (HTML pages);
node.py acts on this node, peer.py on the other one, auth.py holds the credentials, server.py
runs it all under gunicorn (`mirrorha console`)."""
