"""python -m services.store"""
from services.common.runtime import main
from services.store.config import Settings
from services.store.server import build_app

if __name__ == "__main__":
    main("store", Settings, build_app)
