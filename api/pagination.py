"""DRF's page-number pagination, strict about `?page=` and documented in OpenAPI 3.1's terms
(`null` as a type)."""

from rest_framework.pagination import PageNumberPagination

from . import errors


class Pagination(PageNumberPagination):
    # DRF would read an empty `?page=` as page 1 and `last` as the last page; the schema says a
    # whole number from 1, and anything else is the SPEC's 400 (a number past the end is a 404).
    last_page_strings = ()

    def get_page_number(self, request, paginator):
        value = request.query_params.get(self.page_query_param)
        if value is None:
            return 1
        if not (value.isascii() and value.isdigit() and int(value) >= 1):
            raise errors.invalid_request("page must be a whole number from 1", {"field": self.page_query_param})
        return value

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"]["minimum"] = 1
        return parameters

    def get_paginated_response_schema(self, schema):
        response = super().get_paginated_response_schema(schema)
        for prop in response["properties"].values():
            if prop.pop("nullable", False):
                prop["type"] = [prop["type"], "null"]
        return response
