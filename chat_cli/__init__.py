"""The chat service's command-line front ends: `chat` for members and `chat-admin` for administrators."""
