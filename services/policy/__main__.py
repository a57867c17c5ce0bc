"""python -m services.policy"""
from services.common.runtime import main
from services.policy.config import Settings
from services.policy.server import build_app

if __name__ == "__main__":
    main("policy", Settings, build_app)
