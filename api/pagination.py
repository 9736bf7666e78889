"""DRF's page-number pagination, documented in OpenAPI 3.1's terms (`null` as a type)."""

from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    def get_paginated_response_schema(self, schema):
        response = super().get_paginated_response_schema(schema)
        for prop in response["properties"].values():
            if prop.pop("nullable", False):
                prop["type"] = [prop["type"], "null"]
        return response
