"""Seeds the nx-27017 server on 127.0.0.1:PORT: shop.orders, shop.big (2,000 documents, for
max_rows) and shop.victims. nx-27017 keeps documents as JSON, so the BSON types beyond JSON
(Decimal128, binary, dates, ObjectId) are tested against mockupdb instead (mongo_script.py)."""
import sys
from pymongo import MongoClient

client = MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true", serverSelectionTimeoutMS=2000)
shop = client.shop
shop.orders.insert_many([
    {"_id": 1, "customer": "ada", "total": 12.5, "items": 2, "tags": ["a", "b"]},
    {"_id": 2, "customer": "ada", "total": 7.25, "items": 1, "tags": []},
    {"_id": 3, "customer": "bob", "total": 100.0, "items": 5, "tags": ["b"]},
    {"_id": 4, "customer": "o'brien", "total": 1.0, "items": 1, "tags": None},
])
shop.big.insert_many([{"_id": i, "label": f"row {i}"} for i in range(1, 2001)])
shop.victims.insert_many([{"_id": i} for i in range(1, 4)])
